"""The data points: image folders and tar shards read as image sets, augmentation, image characteristics, labels.
May import: metric, errors."""
