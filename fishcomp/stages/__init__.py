"""The stages of the graph, one module each; importing this package registers them all.

A stage module imports only lower layers (fishcomp.graph, features, training, blending, ...),
never another stage: it names the stages it reads by their registered names.
"""

# One line per stage: importing a module runs its @register_stage.
from fishcomp.stages import (
    calibrate,  # noqa: F401
    crops,  # noqa: F401
    ensemble,  # noqa: F401
    precompute,  # noqa: F401
    submit,  # noqa: F401
    train,  # noqa: F401
)
