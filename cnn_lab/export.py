"""`python -m cnn_lab.export`, the documented command of cnn_lab.tools.export."""

from cnn_lab.tools.export import main

if __name__ == "__main__":
    main()
