"""`python -m cnn_lab.baseline`, the documented command of cnn_lab.tools.baseline."""

from cnn_lab.tools.baseline import main

if __name__ == "__main__":
    main()
