"""`python -m cnn_lab.predict`, the documented command of cnn_lab.tools.classify."""

from cnn_lab.tools.classify import main

if __name__ == "__main__":
    main()
