"""`python -m cnn_lab.benchmark`, the documented command of cnn_lab.tools.benchmark."""

from cnn_lab.tools.benchmark import main

if __name__ == "__main__":
    main()
