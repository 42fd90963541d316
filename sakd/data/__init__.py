"""Text and chat data: text sources, spans, collation, the offline Shakespeare corpus, chat formats, rendering
and the chat data set. Knows nothing of models beyond their tokenizers, nothing of training."""
