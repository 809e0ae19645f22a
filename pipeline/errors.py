"""The one error type Retrofit raises for bad input (config, corpus, BEIR folder, model, run folder).

The command line prints these as one line naming the file, row or field; anything else is a bug, or a
library failing, and keeps its traceback. A ValueError subclass, so callers that catch ValueError still do.
"""


class RetrofitError(ValueError):
    pass
