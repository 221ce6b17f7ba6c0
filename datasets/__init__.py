"""COCO-format data, transforms, COCO evaluation and the synthetic shapes generator (arriving with training)."""
