"""tfds builders (array_record, read by index) of decoded frames and of checked items."""
