"""Recurrent nets from first principles, in NumPy: the lesson's second half, exact and verified.

`scan.py` is the generic scan; `rnn.py` the vanilla RNN and GRU cells with hand-written
backpropagation through time; `check.py` compares those gradients with PyTorch autograd and with
finite differences; `charlm.py` trains a character-level language model with them.
"""
