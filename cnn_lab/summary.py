"""`python -m cnn_lab.summary`, the documented command of cnn_lab.tools.summary."""

from cnn_lab.tools.summary import main

if __name__ == "__main__":
    main()
