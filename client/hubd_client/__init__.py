"""hubd_client: get TF Hub / Kaggle models through the machine's hubd daemon.

The public surface (resolve, load, KerasLayer, install_tfhub) arrives with the daemon's API; importing this
package stays standard-library only.
"""

__version__ = "0.1.0"
