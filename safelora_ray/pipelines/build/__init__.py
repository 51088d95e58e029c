"""pipelines/build"""
