"""`python -m cnn_lab.cascade`, the documented command of cnn_lab.tools.cascade."""

from cnn_lab.tools.cascade import main

if __name__ == "__main__":
    main()
