"""The service layer behind the workflow builder's action node.

Input and output models here are the single source of truth: the manifest's JSON Schemas, the
API's validation and the docs' action reference are all generated from them.
"""
