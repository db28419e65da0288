"""From scores to training data: thresholds, DPO pairs, best-of-N reranking, calibration, and the
report. Pure functions live in thresholds / pairs / rerank / calibration / tasks; `job` runs them
on Ray Data; `report` renders a labeled run (and a curation manifest) as one HTML file."""
