# A package only so that setuptools ships posvar_accuracy.py in wheels; evaluate loads the .py file itself.
