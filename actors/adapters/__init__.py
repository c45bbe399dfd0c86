"""The only code that imports confluent_kafka, redis, psycopg, litellm, chromadb or asyncio.

Each adapter maps its library's errors to TransientError / PermanentError once.
"""
