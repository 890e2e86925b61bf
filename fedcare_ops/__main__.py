"""`python -m fedcare_ops` runs the command line."""

from fedcare_ops.cli import main

main()
