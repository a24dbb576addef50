"""Math evaluation: bundled benchmarks, grading, metrics, generation backends, reports."""
