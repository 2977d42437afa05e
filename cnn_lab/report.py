"""`python -m cnn_lab.report`, the documented command of cnn_lab.tools.report."""

from cnn_lab.tools.report import main

if __name__ == "__main__":
    main()
