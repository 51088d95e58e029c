"""pipelines/project_model"""
