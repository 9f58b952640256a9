"""Transfer learning done right: cached VGG16 features, cross-validated heads, one report."""

__version__ = "0.1.0"
