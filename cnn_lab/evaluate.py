"""`python -m cnn_lab.evaluate`, the documented command of cnn_lab.tools.evaluate."""

from cnn_lab.tools.evaluate import main

if __name__ == "__main__":
    main()
