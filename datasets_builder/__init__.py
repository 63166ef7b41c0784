"""datasets_builder: teacher rationales for LDCTIQA-style data -> a chat-format dataset on the Hub or on disk."""
