"""`python -m fedcare` runs the command line."""

from fedcare.cli import main

main()
