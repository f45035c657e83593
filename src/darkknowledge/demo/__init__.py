"""The ``dk demo`` experiments: a digits classifier distilled with few labels, and Hinton's
omitted-class experiment. See ``docs/demo.md``."""
