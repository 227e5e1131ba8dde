"""One module per paper: ``companion/papers/<slug with underscores>.py`` holds the paper's method."""
