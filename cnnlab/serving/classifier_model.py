"""The classifier's MLflow "model from code": MLflow runs this file to get the model object when it
logs and when it loads the model, so nothing is pickled (cnnlab.serving.pyfunc logs it)."""

import mlflow

from cnnlab.serving.pyfunc import ImageClassifier

mlflow.models.set_model(ImageClassifier())
