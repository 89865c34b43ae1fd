# The JDK's keytool and java read the pkcs12 and jks outputs.
apt_needs keytool openjdk-17-jdk-headless
apt_needs java openjdk-17-jdk-headless
