"""`python -m cnn_lab <command> [flags...]`: the `cnn-lab` console script without its script."""

from cnn_lab.cli import main

if __name__ == "__main__":
    main()
