"""`python -m cnn_lab.import_weights`, the documented command of cnn_lab.weights.importing."""

from cnn_lab.weights.importing import main

if __name__ == "__main__":
    main()
