"""The bundled detector: RetinaNet and its variants on torchvision's detection components."""
