"""`python -m seg_train` runs the same entrypoint as the `seg-train` command."""

from seg_train.cli import main

if __name__ == "__main__":
    main()
