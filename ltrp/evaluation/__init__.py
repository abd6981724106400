"""Does a ranker keep what matters? Measures and their names, the evaluation protocol, its report, and
the promotion policy that reads them. No Ray, no MLflow: the pipeline's evaluation job logs them."""
