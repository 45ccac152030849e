"""`python -m mimprobe` (and `torchrun -m mimprobe`) runs the command line."""

from mimprobe.cli import main

if __name__ == "__main__":
    main()
