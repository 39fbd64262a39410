"""quadrant's stages: config, command line and one module per stage."""
