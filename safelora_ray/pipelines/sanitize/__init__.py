"""pipelines/sanitize"""
