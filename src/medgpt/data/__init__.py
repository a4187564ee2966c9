"""Data: readers and formats, validation, templates and masks, stage features and collators."""
