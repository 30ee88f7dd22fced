"""Subjects uploaded once (`POST /subjects`) and reused by id, with their projected tokens shared."""
