"""The jobs, on Ray and MLflow: the only part of ltrp that imports either. Each job is
`run(config) -> summary` in its module; `ltrp.pipeline.configs` holds their configs."""
