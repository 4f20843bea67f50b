"""`crystalscope label`: label crops fast, in the order that teaches a model most."""
