from fishcomp.cli import main

main()
