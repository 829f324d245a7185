"""The placement service: decides which pods hold which models, and activates cold models."""
