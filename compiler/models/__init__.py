"""Model families, offline loading of diffusers folders and single files, the layer registry."""
