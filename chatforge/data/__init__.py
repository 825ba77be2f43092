"""Training data: read records, encode them with the chat template and loss masks, build the training set; identity
data; `chatforge data convert|check`."""
