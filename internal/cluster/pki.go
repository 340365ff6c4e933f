package cluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// pki is the cluster's certificate authority and the files made from it:
//
//	pki/ca.{crt,key}           the cluster CA (also signs CSRs in the controller-manager)
//	pki/apiserver.{crt,key}    serving cert: host IP, 127.0.0.1, the kubernetes service IP and names
//	pki/sa.{pub,key}           service-account token signing pair
//	<user>.kubeconfig          a client cert per user (admin: system:masters)
type pki struct {
	dir    string
	ca     *x509.Certificate
	caKey  crypto.Signer
	caPEM  []byte
	server string
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: generate key: %w", err)
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: encode key: %w", err)
	}
	return k, pemBlock("EC PRIVATE KEY", der), nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	return n
}

func writeFile(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return fmt.Errorf("cluster: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("cluster: write %s: %w", path, err)
	}
	return nil
}

// loadOrMakePKI reads the CA under dir/pki or makes a new one, then makes
// the serving cert and service-account keys if missing.
func loadOrMakePKI(c Config) (*pki, error) {
	p := &pki{dir: filepath.Join(c.Dir, "pki"), server: c.APIServer()}
	crtPath, keyPath := filepath.Join(p.dir, "ca.crt"), filepath.Join(p.dir, "ca.key")
	crtPEM, err1 := os.ReadFile(crtPath)
	keyPEM, err2 := os.ReadFile(keyPath)
	if err1 == nil && err2 == nil {
		cb, _ := pem.Decode(crtPEM)
		kb, _ := pem.Decode(keyPEM)
		if cb == nil || kb == nil {
			return nil, fmt.Errorf("cluster: %s or %s is not PEM", crtPath, keyPath)
		}
		ca, err := x509.ParseCertificate(cb.Bytes)
		if err != nil {
			return nil, fmt.Errorf("cluster: parse %s: %w", crtPath, err)
		}
		k, err := x509.ParseECPrivateKey(kb.Bytes)
		if err != nil {
			return nil, fmt.Errorf("cluster: parse %s: %w", keyPath, err)
		}
		p.ca, p.caKey, p.caPEM = ca, k, crtPEM
	} else {
		k, kpem, err := newKey()
		if err != nil {
			return nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "vhive-cluster-ca"},
			NotBefore:             time.Now().Add(-time.Hour),
			NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
			KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			BasicConstraintsValid: true,
			IsCA:                  true,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, k.Public(), k)
		if err != nil {
			return nil, fmt.Errorf("cluster: create CA: %w", err)
		}
		ca, _ := x509.ParseCertificate(der)
		p.ca, p.caKey, p.caPEM = ca, k, pemBlock("CERTIFICATE", der)
		if err := writeFile(keyPath, kpem, 0o600); err != nil {
			return nil, err
		}
		if err := writeFile(crtPath, p.caPEM, 0o644); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(filepath.Join(p.dir, "apiserver.crt")); err != nil {
		ips := []net.IP{c.HostIP().AsSlice(), net.IPv4(127, 0, 0, 1), c.apiServiceIP().AsSlice()}
		dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
		crt, key, err := p.issue(pkix.Name{CommonName: "kube-apiserver"}, x509.ExtKeyUsageServerAuth, ips, dns)
		if err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(p.dir, "apiserver.key"), key, 0o600); err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(p.dir, "apiserver.crt"), crt, 0o644); err != nil {
			return nil, err
		}
	}
	if _, err := os.Stat(filepath.Join(p.dir, "sa.key")); err != nil {
		k, kpem, err := newKey()
		if err != nil {
			return nil, err
		}
		pub, err := x509.MarshalPKIXPublicKey(k.Public())
		if err != nil {
			return nil, fmt.Errorf("cluster: encode service-account key: %w", err)
		}
		if err := writeFile(filepath.Join(p.dir, "sa.pub"), pemBlock("PUBLIC KEY", pub), 0o644); err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(p.dir, "sa.key"), kpem, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// issue signs a new key's certificate with the CA.
func (p *pki) issue(subj pkix.Name, usage x509.ExtKeyUsage, ips []net.IP, dns []string) (crtPEM, keyPEM []byte, err error) {
	k, kpem, err := newKey()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      subj,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
		IPAddresses:  ips,
		DNSNames:     dns,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, k.Public(), p.caKey)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster: sign certificate for %q: %w", subj.CommonName, err)
	}
	return pemBlock("CERTIFICATE", der), kpem, nil
}

// clientCert writes pki/<name>.{crt,key} (if missing): a client
// certificate for user in groups.
func (p *pki) clientCert(name, user string, groups ...string) (crtPEM, keyPEM []byte, err error) {
	crtPath, keyPath := filepath.Join(p.dir, name+".crt"), filepath.Join(p.dir, name+".key")
	crt, err1 := os.ReadFile(crtPath)
	key, err2 := os.ReadFile(keyPath)
	if err1 == nil && err2 == nil {
		return crt, key, nil
	}
	crt, key, err = p.issue(pkix.Name{CommonName: user, Organization: groups}, x509.ExtKeyUsageClientAuth, nil, nil)
	if err != nil {
		return nil, nil, err
	}
	if err := writeFile(keyPath, key, 0o600); err != nil {
		return nil, nil, err
	}
	if err := writeFile(crtPath, crt, 0o644); err != nil {
		return nil, nil, err
	}
	return crt, key, nil
}

// kubeconfig writes path (if missing) with the client certificate
// pki/<name>.{crt,key} for user in groups.
func (p *pki) kubeconfig(path, name, user string, groups ...string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cluster: %w", err)
	}
	crt, key, err := p.clientCert(name, user, groups...)
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: vhive
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: vhive
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: vhive
  context: {cluster: vhive, user: vhive}
current-context: vhive
`, p.server, b64(p.caPEM), b64(crt), b64(key))
	return writeFile(path, []byte(cfg), 0o600)
}
