"""Train the example's model and export it to ONNX: `python prepare.py [model.onnx]`.

A scikit-learn logistic regression on the iris data set that ships with scikit-learn (nothing
is downloaded), converted with skl2onnx. The ONNX file is all the API needs: its environment
gets ONNX Runtime, not scikit-learn. Run it where scikit-learn and skl2onnx are installed
(`pip install 'cortex-batch[test]'` has both).
"""

import sys

from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression


def main(path: str = "model.onnx") -> None:
    iris = load_iris()
    features = iris.data.astype("float32")
    model = LogisticRegression(max_iter=500).fit(features, iris.target)
    # Plain arrays out (no ZipMap): "label" [N] and "probabilities" [N, 3].
    exported = to_onnx(model, features[:1], options={id(model): {"zipmap": False}})
    with open(path, "wb") as out:
        out.write(exported.SerializeToString())
    print(f"wrote {path}: accuracy on the training data {model.score(features, iris.target):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
