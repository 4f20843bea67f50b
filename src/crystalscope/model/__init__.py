"""Models: timm backbones with a classification head, and the Lightning module that trains them."""
