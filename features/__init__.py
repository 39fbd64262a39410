"""quadrant's lower layer: images, backbones, CNN codes and their HDF5 cache."""
