"""Data in and out, with no Ray and no MLflow: image decoding and views, corpus sources and shards,
the score table's schema and readers, checkpoint loading and saving, the offline data sets."""
