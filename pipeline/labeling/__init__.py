"""The labeling job: corpus -> tokenize -> embed + score on actors -> annotated Parquet, exactly once."""
