"""Model families, one module or folder each; `registry` maps config.json to them."""
