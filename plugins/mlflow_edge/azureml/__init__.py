"""Azure ML (SDK v2, ``azure-ai-ml``): mlflow-edge's flow as an Azure ML pipeline (``mlflow-edge azureml pipeline``)
and an MLflow project backend (``mlflow run . -b azureml``) that submits an entry point as an Azure ML command job.

Only :mod:`.cli` and :mod:`.project_backend` are imported by mlflow-edge's CLI and by MLflow; they import the Azure
SDK when a command runs, so everything else works without the ``azure`` extra.
"""
