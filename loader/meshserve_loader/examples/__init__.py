"""Example user model classes (MLServer MLModel style) for the built-in runtime's custom format."""
